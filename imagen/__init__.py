"""imagen-mnist: a small, faithful, YAML-configured implementation of Imagen.

Submodules are imported explicitly (``from imagen.config import load_stage_config``);
importing the package itself loads nothing heavy and never touches the network.
"""
