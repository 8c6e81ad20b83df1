"""The HTTP layer: a Ray Serve application (FastAPI ingress) that holds no model state.

It authenticates keys, isolates tenants, stores futures durably and answers long polls; the
model work happens in the per-model schedulers and their workers (`twinkle.actors`).
"""
