"""Bundles: finding them (shipped, the local store, a folder), trusting them, parsing their configs,
loading their weights safely, and building the one model that evaluate, infer, export and serve use
(:func:`app.bundle.model.load_model`)."""
