"""The compute SkyEye runs on beside this process: the Ray session that training, the
sharded evaluation and serving share (`ray_session`)."""
