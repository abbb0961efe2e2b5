//! Users and groups for `--user`/`--group`: names resolved to ids (getpwnam_r(3),
//! getgrnam_r(3), getgrouplist(3)) in the master before any fork, since NSS lookups allocate
//! and may open files and sockets, which a forked child must not do. The child then only calls
//! setgroups/setgid/setuid (spawn.rs).

use std::ffi::CString;

/// Who a worker runs as: the ids `setgroups(2)`, `setgid(2)` and `setuid(2)` get in the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id; `None` keeps the master's (only `--group` given).
    pub uid: Option<libc::uid_t>,
    /// Primary group id.
    pub gid: libc::gid_t,
    /// Supplementary groups (the user's, or just `gid`).
    pub groups: Vec<libc::gid_t>,
    /// For logs: `nobody (uid 65534, gid 65534)`.
    pub display: String,
}

impl Credentials {
    /// Resolves `--user` and `--group` (names or numeric ids). With a user and no group, the
    /// user's primary group and supplementary groups; with a group, exactly that group.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Credentials, String> {
        let user_entry = match user {
            None => None,
            Some(u) => Some(lookup_user(u)?),
        };
        let gid = match (group, &user_entry) {
            (Some(g), _) => lookup_group(g)?,
            (None, Some((_, gid, _))) => *gid,
            (None, None) => unreachable!("resolve is called with a user or a group"),
        };
        let groups = match (&user_entry, group) {
            (Some((_, primary, Some(name))), None) => grouplist(name, *primary),
            _ => vec![gid],
        };
        let uid = user_entry.as_ref().map(|(uid, ..)| *uid);
        let display = match (user, uid) {
            (Some(u), Some(id)) => format!("{u} (uid {id}, gid {gid})"),
            _ => format!("gid {gid}"),
        };
        Ok(Credentials {
            uid,
            gid,
            groups,
            display,
        })
    }
}

/// A user name or uid → (uid, primary gid, name if known).
fn lookup_user(user: &str) -> Result<(libc::uid_t, libc::gid_t, Option<CString>), String> {
    let by_name = CString::new(user).map_err(|_| format!("--user {user:?}: contains NUL"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain data, filled by getpwnam_r/getpwuid_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let numeric = user.parse::<libc::uid_t>().ok();
    // SAFETY: every pointer is valid for the call; buf outlives the use of pwd's strings.
    let rc = unsafe {
        match numeric {
            Some(uid) => libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            ),
            None => libc::getpwnam_r(
                by_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            ),
        }
    };
    if rc == 0 && !result.is_null() {
        // SAFETY: on success pw_name points into buf, NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }.to_owned();
        return Ok((pwd.pw_uid, pwd.pw_gid, Some(name)));
    }
    match numeric {
        // A uid with no passwd entry is fine (containers): its own number as the group.
        Some(uid) => Ok((uid, uid, None)),
        None => Err(format!("--user {user}: no such user")),
    }
}

/// A group name or gid → gid.
fn lookup_group(group: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = group.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| format!("--group {group:?}: contains NUL"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: group is plain data, filled by getgrnam_r.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        Ok(grp.gr_gid)
    } else {
        Err(format!("--group {group}: no such group"))
    }
}

/// The user's groups (getgrouplist(3)), or just the primary one if that fails.
fn grouplist(name: &CString, primary: libc::gid_t) -> Vec<libc::gid_t> {
    let mut n: libc::c_int = 64;
    for _ in 0..4 {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: groups has room for `count` entries; getgrouplist updates count.
        let rc =
            unsafe { libc::getgrouplist(name.as_ptr(), primary, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return groups;
        }
        n = count.max(n * 2);
    }
    vec![primary]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_root_by_name_and_number() {
        let by_name = Credentials::resolve(Some("root"), None).unwrap();
        assert_eq!((by_name.uid, by_name.gid), (Some(0), 0));
        assert!(by_name.groups.contains(&0));
        let by_id = Credentials::resolve(Some("0"), Some("0")).unwrap();
        assert_eq!((by_id.uid, by_id.gid, by_id.groups), (Some(0), 0, vec![0]));
        let group_only = Credentials::resolve(None, Some("12345")).unwrap();
        assert_eq!((group_only.uid, group_only.gid), (None, 12345));
        assert!(
            Credentials::resolve(Some("no-such-user-x"), None)
                .unwrap_err()
                .contains("no such user")
        );
    }
}
