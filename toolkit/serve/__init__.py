"""`optkit serve`: the exported system as one OpenAI-compatible endpoint (cache -> router -> student/teacher).

Kept import-free: evaluate's replay imports toolkit.serve.decide (numpy only) without FastAPI or uvicorn;
toolkit.serve.server / toolkit.serve.app pull those in (the `serve` extra).
"""
