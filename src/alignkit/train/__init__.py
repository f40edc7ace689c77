"""Training: the shared loop and its batching, the losses, the SFT and reward-model jobs, rewards behind
one protocol (single, ensemble, priority), the PPO math, rollouts with the value head, and the PPO job."""
