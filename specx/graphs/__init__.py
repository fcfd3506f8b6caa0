"""The ONNX side of specx: the I/O contract shared with the runtime, graph passes and small helper graphs.

``specx.graphs.contract`` imports neither torch nor onnx, so the runtime can use it.
"""
