"""ctunnel's code: one module per concern (see README.md, Development).

ctunnel.py beside this folder is the command cron runs; it imports cli.main.
"""

__version__ = "0.2.0"
