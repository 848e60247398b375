"""One module per weight-search method; ``ensemble.weights`` holds the registry over them."""
