"""The CPU execution path: `path.py` chooses between the compiled fast path and the PyTorch reference and applies it;
`linear.py` holds the compact linear layers, `decoder.py` / `attention.py` the decoder ops, decode attention and the
one-call decode layer (`layer_desc.py`: its ctypes structs); the C sources (`linear.c`, `ops.c`, `layer.c`,
`half.h`) are compiled once by `build.py`."""
