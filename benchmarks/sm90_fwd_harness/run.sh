# run.sh: the harness binaries built by build.sh, on an sm_90 GPU: the SM80 and SM90 forwards on odd
# sizes (outputs compared), timed at the paper sizes, then compute-sanitizer memcheck and racecheck.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for D in 128 64 256; do
  ./harness_d$D $D 1000 1037 2 4 2 0; ./harness_d$D $D 1000 1037 2 4 2 1; ./harness_d$D $D 1 17 1 2 1 0; ./harness_d$D $D 97 1025 1 2 2 1; ./harness_d$D $D 2000 2000 1 4 4 1 256
done
./harness_d128 128 16384 16384 1 16 16 0; ./harness_d128 128 16384 16384 1 16 16 1
./harness_d64 64 4096 4096 4 32 32 0; ./harness_d64 64 4096 4096 4 32 32 1
./harness_d256 256 4096 4096 4 8 8 0; ./harness_d256 256 4096 4096 4 8 8 1
timeout 120 compute-sanitizer --tool memcheck ./harness_d128 128 300 333 1 2 2 1 2>&1 | tail -3
timeout 120 compute-sanitizer --tool racecheck ./harness_d128 128 300 333 1 2 2 1 2>&1 | tail -3
