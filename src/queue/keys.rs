//! Every Redis key and channel name of the protocol. All keys of one model carry the
//! Redis Cluster hash tag `{<model>}`, so they share a slot and one script may touch
//! them together.

/// The consumer group every worker joins.
pub const GROUP: &str = "inferq";

/// The keys of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    model: String,
    jobs: String,
    dlq: String,
    done: String,
    inflight: String,
    reply_prefix: String,
}

impl Keys {
    /// Keys for `model` (a name the registry accepted, so no `}` can break the tag).
    pub fn new(model: &str) -> Keys {
        Keys {
            model: model.to_owned(),
            jobs: format!("inferq:{{{model}}}:jobs"),
            dlq: format!("inferq:{{{model}}}:dlq"),
            done: format!("inferq:{{{model}}}:done"),
            inflight: format!("inferq:{{{model}}}:inflight"),
            reply_prefix: format!("inferq:{{{model}}}:reply:"),
        }
    }

    /// The model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// `inferq:{m}:jobs`: the jobs stream (consumer group [`GROUP`]).
    pub fn jobs(&self) -> &str {
        &self.jobs
    }

    /// `inferq:{m}:dlq`: dead-lettered jobs with their last error.
    pub fn dlq(&self) -> &str {
        &self.dlq
    }

    /// `inferq:{m}:done`: pub/sub channel of job ids that turned terminal.
    pub fn done(&self) -> &str {
        &self.done
    }

    /// `inferq:{m}:inflight`: entry id → job id of delivered jobs, so a pending entry
    /// trimmed from the stream can still be answered.
    pub fn inflight(&self) -> &str {
        &self.inflight
    }

    /// `inferq:{m}:job:<id>`: the job record while it is queued or running (a hash).
    pub fn job(&self, id: &str) -> String {
        format!("inferq:{{{}}}:job:{id}", self.model)
    }

    /// `inferq:{m}:result:<id>`: the terminal record (a string of JSON, set once).
    pub fn result(&self, id: &str) -> String {
        format!("inferq:{{{}}}:result:{id}", self.model)
    }

    /// True when `key` is a reply list this model's workers may write to.
    pub fn is_reply_key(&self, key: &str) -> bool {
        key.len() > self.reply_prefix.len()
            && key.starts_with(&self.reply_prefix)
            && key.len() <= 512
    }

    /// The prefix every `reply_to` must start with.
    pub fn reply_prefix(&self) -> &str {
        &self.reply_prefix
    }
}

/// The model of a `done` channel name (`inferq:{m}:done`).
pub fn model_of_done_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("inferq:{")?.strip_suffix("}:done")
}

/// Pattern matching every model's `done` channel.
pub const DONE_PATTERN: &str = "inferq:{*}:done";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag() {
        let k = Keys::new("digits");
        assert_eq!(k.jobs(), "inferq:{digits}:jobs");
        assert_eq!(k.job("a1"), "inferq:{digits}:job:a1");
        assert_eq!(k.result("a1"), "inferq:{digits}:result:a1");
        assert!(k.is_reply_key("inferq:{digits}:reply:me"));
        assert!(!k.is_reply_key("inferq:{digits}:reply:"));
        assert!(!k.is_reply_key("inferq:{other}:reply:me"));
        assert!(!k.is_reply_key("somewhere:else"));
        assert_eq!(model_of_done_channel(k.done()), Some("digits"));
    }
}
