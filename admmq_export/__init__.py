"""admmq-export: ADMM-Q/GPTQ/RTN quantization on the grid of the target format, exported bit-exactly."""
__version__ = "0.1.0"
