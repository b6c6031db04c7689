"""The parent process and how it starts its children: arbiter loop, pools, slots, watching, autoscaling, config.

Nothing here imports DataJoint at module level: the parent does no database work (a test checks it). The
child's code (`child`) runs after fork and imports the worker package there.
"""
