"""Installing what pip cannot: the patched Horovod build (`mpidl setup horovod`), the CUDA
architectures a build carries, and the example jobs and studies (`mpidl examples`)."""
