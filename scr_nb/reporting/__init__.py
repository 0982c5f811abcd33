"""Step 5, reporting: pandas frames over one or many stores, the analysts' charts, and the HTML
report. Hands tables and figures to the notebooks and to ``scr-nb report``.
"""
