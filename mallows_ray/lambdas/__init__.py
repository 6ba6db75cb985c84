"""Preference weights lambda (ALGORITHMS.md sections 3, 3.1, 3.2).

vectors     lambda as K weights in objective order: parsing `--lambda` and config values, and the one rendering
            of lambda into a prompt (`format_lambda`, `condition_messages`, section 3.1)
schedulers  the lambda scheduler that draws each example's lambda: fixed, dirichlet, table, learned (section 3.2)

Pure python + torch/numpy: nothing here imports ray, deepspeed or transformers.
"""
