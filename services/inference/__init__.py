"""Text generation and embeddings on ONNX Runtime, behind one scheduler."""
