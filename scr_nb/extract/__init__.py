"""Step 1, the extract: read the practice's CSV files into records, check NHS numbers, and decide
who is eligible with one reason for everyone else. Hands ``Practice`` and ``Decision``s to the job.
"""
