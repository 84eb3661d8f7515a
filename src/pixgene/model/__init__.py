"""The model layer: :class:`PixNet` (save / load / members), building its torch module, and feature
standardisation. Above :mod:`pixgene.nn`; below :mod:`pixgene.train` and :mod:`pixgene.infer`."""
