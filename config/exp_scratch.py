# Growth experiment: stage 3's shape from scratch, the ladder's FLOPs (regime t's scratch budget).
out_dir = "out/exp/scratch"
data_dir = "data/gutenberg/llama2_v32000"
vocab_size = 32000
n_layer, n_head, head_dim, ffn_hidden = 12, 6, 128, 2048
max_iters = 1984
learning_rate, min_lr, warmup_iters = 1e-3, 1e-4, 100  # WSD: warm up, then hold
cooldown_iters = 397  # over the last 20%
block_size = 1024
batch_size, grad_accum_steps = 64, 1  # 64k tokens per iteration
eval_interval, eval_windows, log_interval = 100, 512, 50
compile = True
