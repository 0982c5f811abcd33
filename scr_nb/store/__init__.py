"""Step 3, the store: every patient's state and every message, job, lock and log line of a practice,
and every SQL statement of the kit. Hands counters, rows and the status object to the job and reports.
"""
