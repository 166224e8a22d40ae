//! The ledger file test agents append to as they start.

use agent_worker::settings::Settings;

use super::{TEST_AGENT, TestRedis};

/// A file every test agent started with [`Ledger::command`] appends `<room> <pid>` to as it
/// starts, synchronously: what tells that an agent never ran, unlike its shipped logs, which
/// arrive later.
pub struct Ledger(std::path::PathBuf);

impl Ledger {
    /// A new, empty ledger.
    pub fn new() -> Self {
        Self(std::env::temp_dir().join(format!("agent-ledger-{}", ulid::Ulid::generate())))
    }

    /// `agent.command` of the test agent with `behaviour`, writing to this ledger.
    pub fn command(&self, behaviour: &str) -> String {
        format!(
            "{TEST_AGENT},--behaviour,{behaviour},--ledger,{}",
            self.0.display()
        )
    }

    /// Settings of an in-process worker on `redis` whose agents (the test agent with
    /// `behaviour`) write to this ledger; `extra` overrides.
    pub fn worker_settings(
        &self,
        redis: &TestRedis,
        behaviour: &str,
        extra: &[(&str, &str)],
    ) -> Settings {
        let command = self.command(behaviour);
        let mut overrides = vec![("AGENT_WORKER__AGENT__COMMAND", command.as_str())];
        overrides.extend_from_slice(extra);
        redis.settings(behaviour, &overrides)
    }

    /// The test agent with `args` (comma-separated) as a warm process of the pool
    /// (`agent.warm_command`), writing to this ledger.
    pub fn warm_command(&self, args: &str) -> String {
        let args = if args.is_empty() {
            String::new()
        } else {
            format!(",{args}")
        };
        format!("{TEST_AGENT},--warm,--ledger,{}{args}", self.0.display())
    }

    fn lines(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').map(str::to_owned).collect())
            .collect()
    }

    /// The rooms of every agent started so far (warm processes once handed their session).
    pub fn rooms(&self) -> Vec<String> {
        self.sessions().into_iter().map(|(room, _)| room).collect()
    }

    /// `(room, pid)` of every agent started so far.
    pub fn sessions(&self) -> Vec<(String, u32)> {
        self.lines()
            .into_iter()
            .filter(|l| l.len() == 2 && l[0] != "warm")
            .filter_map(|l| Some((l[0].clone(), l[1].parse().ok()?)))
            .collect()
    }

    /// `(pid, unix ms)` of every warm process started so far, in order.
    pub fn warm_starts(&self) -> Vec<(u32, u64)> {
        self.lines()
            .into_iter()
            .filter(|l| l.len() == 3 && l[0] == "warm")
            .filter_map(|l| Some((l[1].parse().ok()?, l[2].parse().ok()?)))
            .collect()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
