"""The benchmarks of mamlext against pure-PyTorch MAML: `python -m mamlext bench` (suite), the implementations it
compares (impls), the shared timing, checks and memory measurement (common), the table and plot (report) and the
task_sgd pieces (task_sgd), the 1-vs-P-process throughput of `--distributed P` (distributed). benchmarks/*.py reuse
them."""
