# Tiny CPU baseline: stage 2's final shape (181,584 parameters) from scratch for the ladder's total iterations.
out_dir = "out/tiny_scratch"
data_dir = "data/tinyshakespeare/llama2_v1024"
vocab_size = 1024
n_layer, n_head, head_dim, ffn_hidden, block_size = 3, 3, 16, 128, 64
batch_size = 16
max_iters = 300
learning_rate, min_lr, warmup_iters = 3e-3, 3e-4, 10  # WSD: warm up, then hold
eval_interval, eval_windows, log_interval = 50, 128, 10
