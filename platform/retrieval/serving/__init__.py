"""Ray Serve application: shard deployments, an embedder and a FastAPI search ingress.

`retrieval.serving.app:build_app` is the application builder named by `serve/*.yaml`.
"""
