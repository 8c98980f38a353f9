"""pipeline: everything that moves records. Reading shards, decoding images, face detection,
alignment and paste-back, the Ray stages that wrap ``dr2``, writing shards, per-shard stats and resume.

Depends on ``dr2``; never imported by it.
"""
