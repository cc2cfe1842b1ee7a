"""raylm serving: exported models behind an OpenAI-compatible, autoscaled Ray Serve endpoint.

`serving` reads the directory written by `python -m training.export` (see `serving.export_format`)
and never imports `training`. Entry point for Serve configs: `serving.app:build`.
"""
