from adj_quant.seed_quantizers.cli import main

main()
