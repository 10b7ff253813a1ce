//! Who may do what: the one place that decides access, for every method. A principal's scopes
//! ([`Principal::may`]) meet here what each method touches: a tool's [`super::Grant`], the
//! toolset that owns a resource, template or prompt. The HTTP layer asks before it admits a
//! request (a tool call, a listen: refused with `403 insufficient_scope` naming the scope), the
//! handler while it answers (lists filtered; a resource or prompt outside the caller's grants does
//! not exist for it).

use rmcp::model::{Prompt, Tool};

use super::{Catalog, Toolbox};
use crate::principal::Principal;

impl Toolbox {
    /// `tools/call` of `tool`: the scope `caller` lacks for it, if any. An unknown tool needs
    /// nothing here (the router answers that it does not exist).
    pub fn scope_lacking_for_call(&self, caller: &Principal, tool: &str) -> Option<String> {
        self.grants
            .get(tool)
            .filter(|grant| !caller.may(grant.toolset, grant.write))
            .map(|grant| grant.scope())
    }

    /// `tools/list`: the tools `caller` may call.
    pub fn tools_for(&self, caller: &Principal) -> Vec<Tool> {
        self.router
            .list_all()
            .into_iter()
            .filter(|tool| {
                self.grants
                    .get(tool.name.as_ref())
                    .is_some_and(|grant| caller.may(grant.toolset, grant.write))
            })
            .collect()
    }

    /// `subscriptions/listen` of `uris`: the scope `caller` lacks for the first URI it may not
    /// follow, if any. A URI no toolset owns is left to the listen's own checks (it is refused
    /// there as not subscribable).
    pub fn scope_lacking_for_follow<'a>(
        &self,
        caller: &Principal,
        uris: impl IntoIterator<Item = &'a String>,
    ) -> Option<&'static str> {
        uris.into_iter().find_map(|uri| {
            self.catalog
                .toolset_of(uri)
                .filter(|toolset| !caller.may(toolset, false))
        })
    }
}

impl Catalog {
    /// Whether `caller` may read (list, read, subscribe to) the resource or template `uri`.
    pub fn may_read(&self, caller: &Principal, uri: &str) -> bool {
        caller.is_unrestricted()
            || self
                .toolset_of(uri)
                .is_some_and(|toolset| caller.may(toolset, false))
    }

    /// Whether `caller` may read what the toolset `name` offers (its resources and prompts).
    pub(super) fn may_use(caller: &Principal, toolset: &str) -> bool {
        caller.may(toolset, false)
    }

    /// The prompts `caller` may get.
    pub fn prompts_for(&self, caller: &Principal) -> Vec<Prompt> {
        self.prompts
            .iter()
            .filter(|(toolset, _)| Self::may_use(caller, toolset.name()))
            .map(|(_, prompt)| prompt.clone())
            .collect()
    }
}
