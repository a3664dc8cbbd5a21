# Ladder stage 1: 10 layers, 5 heads of 128 (d=640), FFN 1792, vocabulary 4096.
# `python model.py config/stage*.py` prints every stage's parameters and FLOPs per token.
out_dir = "out/stage1"
data_dir = "data/gutenberg/llama2_v4096"
vocab_size = 4096
n_layer, n_head, head_dim, ffn_hidden, block_size = 10, 5, 128, 1792, 2048
batch_size, grad_accum_steps = 32, 8  # 0.5M tokens per iteration on 8 GPUs or 1 (accumulating); micro-batch 32: fewer launches per token (README, Speed)
max_iters = 400  # the study's best timing against both scratch shapes (steps4): short early stages, 1:1:2:2:4:4, 40% of the tokens, then stage 7 for 60% (README)
learning_rate, min_lr, warmup_iters = 6e-04, 6e-05, 100  # WSD: warm up, then hold (README, Does growing pay?)
eval_interval, eval_windows, log_interval = 250, 160, 10
compile = True
