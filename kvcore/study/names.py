"""The names the study, the search and their command line share: one definition each (the command line
declares its choices from here, the experiments check them against the same tuples)."""

EVICTION = ("streaming_llm", "sliding_window", "h2o")
QUANTIZED = {"int8": "int8-token", "int4": "int4-token", "kivi-2": "kivi-2"}  # study name -> quant method
METHODS = ("full", *EVICTION, "minicache", *QUANTIZED, "gqa")
DTYPES = ("float32", "float16", "bfloat16")
TABLES = ("summary", "steps", "texts")
SEARCH_TABLES = ("configs", "capacity", "pareto")
LATENCIES = ("ttft_ms_p99", "tpot_ms_p99", "e2e_ms_p99")
