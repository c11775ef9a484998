"""Reference math (:mod:`mhc_fx.nn.functional`) and the connection modules."""

from .connections import Connection, DeepSeekV4Connection, DeepSeekV4Head, HCConnection, MHCConnection, PostResMix, StreamExpand, StreamReduce, post_res_mix

__all__ = ["Connection", "MHCConnection", "DeepSeekV4Connection", "DeepSeekV4Head", "HCConnection", "StreamExpand", "StreamReduce", "PostResMix", "post_res_mix"]
