"""The lookup service: nearest-neighbour image search over an lvd index, as a blocking core
(`service`) under a FastAPI app (`app`) on uvicorn (`server`), with the `lvd index` commands (`cli`)."""
