"""Ahead-of-time compilation for TPU slices on a CPU host (no TPU needed).

`tpu`: Cloud TPU accelerator types -> topologies and chip specs;
`compile_step`: compiles the train and eval steps `main` would run and
reports memory, FLOPs and the int8 matmuls; `hlo`: reads the optimized HLO;
`find_batch`: searches the largest batch that fits; `report`: the report as
the command's table.
The command line is `python -m bitnet_jax.compile`.
"""
