"""Test and demo equipment, never imported by the product: the Spine simulator, its identity
provider, synthetic practices and the demo. Only the CLI's commands that start them import it.
"""
