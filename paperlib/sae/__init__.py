"""The SAE: a bank of seeds trained at once (``bank``), its architectures, the zoo's sparsity presets
(``zoo_presets``), the training loop (``train``) and the CPU step's kernels (``kernels``)."""
