"""Step 2, the Spine: what goes into a summary, the GP Summary XML in its ebXML envelope, the
HTTP client with its retries, the acks it reads and the Smartcard session. Hands outcomes to the job.
"""
