# Tiny CPU ladder, stage 1: 59,552 parameters (train.py's count); 150 iterations in a few seconds on 2 cores.
# python prepare.py --dataset tinyshakespeare --tiers 512 1024   (writes data/tinyshakespeare/llama2_v*)
out_dir = "out/tiny_stage1"
data_dir = "data/tinyshakespeare/llama2_v512"
vocab_size = 512
n_layer, n_head, head_dim, ffn_hidden, block_size = 2, 2, 16, 96, 64
batch_size = 16
max_iters = 150
learning_rate, min_lr, warmup_iters = 3e-3, 3e-4, 10  # WSD: warm up, then hold
eval_interval, eval_windows, log_interval = 50, 128, 10
