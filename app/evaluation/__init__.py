"""Evaluation: segmentation metrics (Dice, HD95 in mm) and ``segapp evaluate``, which runs a bundle's
own evaluate config with the model from :func:`app.bundle.model.load_model`."""
