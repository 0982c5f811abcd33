"""Step 4, the job: options, the four modes and their refusals, the send and track pipeline, the
schedule watcher, and the runner the CLI and the notebooks call. Hands outcomes and progress to the ui.
"""
