module rcluster.invalid/worker

go 1.19
