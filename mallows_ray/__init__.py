"""mallows_ray: Ray-distributed preference optimisation (DPO family, MallowsPO, listwise lambda-DPO)."""
__version__ = "0.1.0"
