"""Tools that verify the GPU code on machines without a GPU (docs/design.md §4.2 and §4.3).

* ``aot`` — compile a Triton kernel ahead of time for sm_80 / sm_90 and read the cubin's register,
  shared-memory and local-memory (spill) usage with ``cuobjdump``; an occupancy estimate.
* ``traffic`` — count the bytes Triton kernels load and store in the interpreter, and the bytes
  every aten op reads and writes (the naive PyTorch measure).

Nothing here needs a GPU, and nothing here measures time: every GPU time it prints is a roofline
estimate from counted bytes and a stated bandwidth.
"""
