"""Reading and writing models: the Hub, the MLX folder format, conversion, loading, fusing."""
