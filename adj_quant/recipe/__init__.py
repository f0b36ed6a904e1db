"""The experiment: the five-stage recipe, its configuration, input pipelines, trainer and
validation. The library it uses is the rest of ``adj_quant``; the command-line tools that
run it are in ``adj_quant.cli``."""
