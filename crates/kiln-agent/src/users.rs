//! Resolving user specs (`name`, `uid`, `uid:gid`) from the guest's `/etc/passwd` and
//! `/etc/group`. The agent is a static binary, so it reads the files itself instead of going
//! through NSS.

use std::path::Path;

use kiln_proto::messages::{AgentError, ErrorKind};

/// Identity a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIds {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Login name, if the user is in `/etc/passwd`.
    pub name: Option<String>,
    /// Home directory (`/` if unknown).
    pub home: String,
}

#[derive(Debug, Clone)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_owned(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_owned(),
            })
        })
        .collect()
}

fn supplementary_groups(group_text: &str, name: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for line in group_text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            continue;
        }
        let Ok(gid) = fields[2].parse::<u32>() else {
            continue;
        };
        if fields[3].split(',').any(|member| member == name) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

/// Resolves `spec` against the passwd and group files under `root`.
pub fn resolve_user(root: &Path, spec: &str) -> Result<UserIds, AgentError> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap_or_default();
    resolve_in(&passwd, &group, spec)
}

fn resolve_in(passwd: &str, group: &str, spec: &str) -> Result<UserIds, AgentError> {
    let entries = parse_passwd(passwd);
    let invalid = || AgentError::new(ErrorKind::InvalidArgument, format!("invalid user `{spec}`"));
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() {
        return Err(invalid());
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => entries.iter().find(|e| e.uid == uid).cloned(),
        Err(_) => Some(
            entries
                .iter()
                .find(|e| e.name == user_part)
                .cloned()
                .ok_or_else(|| {
                    AgentError::new(
                        ErrorKind::NotFound,
                        format!("no user `{user_part}` in /etc/passwd"),
                    )
                })?,
        ),
    };
    let uid = match &entry {
        Some(e) => e.uid,
        None => user_part.parse().map_err(|_| invalid())?,
    };
    let gid = match group_part {
        Some(g) => g.parse().map_err(|_| invalid())?,
        None => entry.as_ref().map_or(uid, |e| e.gid),
    };
    let groups = match (&entry, group_part) {
        (Some(e), None) => supplementary_groups(group, &e.name, gid),
        _ => vec![gid],
    };
    Ok(UserIds {
        uid,
        gid,
        groups,
        name: entry.as_ref().map(|e| e.name.clone()),
        home: entry.map_or_else(|| "/".to_owned(), |e| e.home),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          user:x:1000:1000:User:/home/user:/bin/sh\n\
                          broken line\n";
    const GROUP: &str = "root:x:0:\nuser:x:1000:\nwheel:x:10:user,other\n";

    #[test]
    fn resolves_names_ids_and_pairs() {
        let user = resolve_in(PASSWD, GROUP, "user").expect("known user");
        assert_eq!((user.uid, user.gid), (1000, 1000));
        assert_eq!(user.groups, vec![1000, 10]);
        assert_eq!(user.home, "/home/user");
        let by_id = resolve_in(PASSWD, GROUP, "1000").expect("known uid");
        assert_eq!(by_id.name.as_deref(), Some("user"));
        let unknown_id = resolve_in(PASSWD, GROUP, "4242").expect("numeric ids need no entry");
        assert_eq!(
            (unknown_id.uid, unknown_id.gid, unknown_id.home.as_str()),
            (4242, 4242, "/")
        );
        let pair = resolve_in(PASSWD, GROUP, "1000:10").expect("explicit pair");
        assert_eq!((pair.uid, pair.gid, pair.groups), (1000, 10, vec![10]));
    }

    #[test]
    fn rejects_unknown_names_and_garbage() {
        assert_eq!(
            resolve_in(PASSWD, GROUP, "nobody").map_err(|e| e.kind),
            Err(ErrorKind::NotFound)
        );
        for bad in ["", ":1", "1:x", "x:y"] {
            assert!(
                resolve_in(PASSWD, GROUP, bad).is_err(),
                "{bad} must be rejected"
            );
        }
    }
}
