"""The CPU execution path: `path.py` chooses between the compiled fast path and the PyTorch reference and applies it;
`linear.py` holds the compact linear layers, `decoder.py` / `attention.py` the decoder ops and decode attention; the
C sources (`linear.c`, `ops.c`, `half.h`) are compiled once by `build.py`."""
