# ctunnel as a system cron job: copy to /etc/cron.d/ctunnel (mode 644, owned by
# root, no dot in the file name). Unlike a user crontab, each line names the
# user the job runs as: the user whose key logs in to the server, never root
# unless the tunnel really needs it.
PATH=/usr/bin:/bin
#MAILTO=you@example.com

# m h dom mon dow user command
* * * * * pi /home/pi/ctunnel/ctunnel.py -c /etc/ctunnel/rstunnel.conf
