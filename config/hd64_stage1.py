# head_dim-64 ladder, stage 1: 14 layers, 8 heads of 64 (d=512), FFN 1536, vocabulary 4096.
# Same size as stage1.py (~52M) but 8 heads instead of 5; hd64_stage2.py doubles head_dim to Llama's 128.
# `python model.py config/hd64_stage*.py` prints the shapes, parameters and FLOPs per token.
out_dir = "out/hd64_stage1"
data_dir = "data/gutenberg/llama2_v4096"
vocab_size = 4096
n_layer, n_head, head_dim, ffn_hidden, block_size = 14, 8, 64, 1536, 2048
batch_size, grad_accum_steps = 32, 8  # 0.5M tokens per iteration on 8 GPUs or 1 (accumulating); micro-batch 32: fewer launches per token (README, Speed)
max_iters = 2000
learning_rate, min_lr, warmup_iters = 6e-04, 6e-05, 100  # WSD: warm up, then hold
eval_interval, eval_windows, log_interval = 250, 160, 10
compile = True
