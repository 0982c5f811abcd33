"""The shells people use: the ``scr-nb`` command, the control panel's widgets, the support desk and
scheduled runs. They compute nothing of their own: they call the job's runner and the reports.
"""
