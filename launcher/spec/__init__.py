"""What a run is asked to be: recipe and cluster-profile schemas (recipe.py), SFT prompts (prompts.py), and the
facts about the world as data with their sources (catalog/: models, GPUs, prices, providers, priors)."""
