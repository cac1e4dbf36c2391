"""The model store: catalog and presets, the store index, resolving references, the hub,
header previews of remote files, pull, and the default model embedded in a PyPI wheel."""
