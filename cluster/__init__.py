"""Taking raylm runs to Ray clusters: launcher configs, job submission, preflight checks, a local multi-node cluster.

Nothing here imports torch: these modules run on laptops and CI machines that never load a model.
"""
